"""After the run: the bundle format, export, predict/evaluate and the report. Imports tune_app.spec and what
tune_app.train offers for loading a model and scoring it."""
