"""sqs-loadtest: N concurrent edge clients against one cloud verifier on loopback.

    from loadtest.runner import LoadTestConfig, run_load_test
    report = run_load_test(LoadTestConfig(clients=(1, 4), requests=16, max_new_tokens=32))
    report.levels[0].summary()["latency_ms"]["p95"]
"""
