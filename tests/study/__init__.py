"""Components a study brings, named by `model.target` in the tests' configs."""
