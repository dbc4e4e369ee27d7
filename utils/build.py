"""`python -m utils.build [--check | --execute NOTEBOOK...]`: build chapters/ from solutions/ (utils/course/build.py)."""

import sys

from utils.course.build import main

if __name__ == "__main__":
    sys.exit(main())
