"""Small helpers shared by the CLIs, trainers and evaluators."""
