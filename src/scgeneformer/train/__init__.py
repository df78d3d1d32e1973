"""Training machinery shared by pretraining and fine-tuning.

Loops, optimiser and schedule, training checkpoints, process groups.
"""
