"""One module per pipeline stage: data, train (stage 1, stage 2, fidelity, stage 3), evaluate, register."""
