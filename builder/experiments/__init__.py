"""The papers' experiments as commands (`ratchet experiment NAME`): each trains and scores its
arms from a workspace's compiled generations, resumes what it finished, and writes a table,
results.json and a plot under WS/experiments/NAME/."""
