"""`python -m utils.grade NOTEBOOK...`: grade learners' notebooks (the code is in utils/course/grade.py)."""

import sys

from utils.course.grade import main

if __name__ == "__main__":
    sys.exit(main())
