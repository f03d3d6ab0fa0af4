"""Reference implementation of a production ML loop for weld-defect radiographs.

Read it as the chapter "Model Deployment and Monitoring" in code: one module per stage of the loop
(data -> model -> training -> packaging -> inference -> ...). Heavy libraries are imported lazily inside the
functions that need them, so importing this package is cheap.
"""

__version__ = "0.1.0"
