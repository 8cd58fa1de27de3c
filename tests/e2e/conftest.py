# Markers select one group of test_e2e.py (reliability: test_reliability.py) per CTest entry (tests/e2e/CMakeLists.txt).
GROUPS = ["bad_input", "tiny_run", "resume", "skip_overwrite", "determinism", "clean_state", "swmr", "sigterm",
          "dry_run_version", "data_parallel", "dsrsq", "reliability"]


def pytest_configure(config):
    for g in GROUPS:
        config.addinivalue_line("markers", f"{g}: end-to-end test group {g}")
