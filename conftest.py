"""pytest configuration shared by tests/ and the solution notebooks (utils/course/nbtest.py collects those)."""

pytest_plugins = ["utils.course.nbtest"]
