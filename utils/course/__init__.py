"""The machinery that builds, grades and benchmarks the course: not part of the learner's toolkit.

    build.py      solutions/ -> chapters/ (stubs, setup cell, metadata); `python -m utils.build`
    checking.py   the @exercise decorator, Check, run_check and the expect_* comparisons every check uses
    remote.py     plain-data messages between the grader's clean process and a learner's kernel
    agent.py      the learner-kernel side of those messages (runs the learner's function on the grader's inputs)
    sandbox.py    a disposable bubblewrap sandbox for a learner's kernel
    notebooks.py  notebook I/O and a kernel that runs a notebook cell by cell
    judge.py      grades one notebook: runs it in a sandboxed kernel, then runs the checks in this process
    grade.py      grades a class's notebooks and writes the reports; `python -m utils.grade`
    nbtest.py     the pytest plugin that executes each solution notebook once, compares outputs, and grades it
    bench.py      runtime and peak memory of a notebook; `python -m utils.course.bench`
    stats.py      exercises and reference-solution lines per chapter; `python -m utils.course.stats`
    suitecost.py  what each part of the test suite costs and the 20-chapter projection (a pytest plugin too)
    colab.py      the setup cell every notebook starts with, and REPO_URL
"""
