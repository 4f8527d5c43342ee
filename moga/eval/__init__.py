"""Evaluations with a program for a judge. `python -m moga.eval demo`: the demo model on held-out stories."""
