"""pytest configuration shared by tests/ and the solution notebooks (utils/course/nbtest.py collects those)."""

# nbtest executes the solution notebooks; suitecost records what every test costs (BENCHMARKS.md).
pytest_plugins = ["utils.course.nbtest", "utils.course.suitecost"]
