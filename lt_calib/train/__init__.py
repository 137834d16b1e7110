"""Training: the state and optimizer (state), the step (step), its compiled
forms (setup), the loop (loop), a run end to end (trainer), and K runs in one
program (population)."""
