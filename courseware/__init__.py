"""Instructor tooling: release and autograde labs (grading), the SME overlay (overlay), the chapter build
(book), quizzes (quiz) and a grading term end to end (instructor). ``python -m courseware --help`` lists the commands.
"""
