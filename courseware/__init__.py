"""Instructor tooling: releasing labs, autograding, and (later) quizzes, the SME overlay and grade export."""
