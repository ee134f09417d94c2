"""What a study is, before anything runs: the schema and its loader, search-space syntax, model families, data
sources, path predicates and the run directory's layout. Imports neither Ray nor torch (validate/show/keys stay
instant) and nothing else of tune_app's but its errors."""
