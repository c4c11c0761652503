"""The verbs beyond mounting, one module each: inspect, history, lint, diff, commit, which/explain, run.

Each returns data; printing is the CLI's business.
"""
