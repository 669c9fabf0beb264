"""Training: one loop for every learned method, and the SyN supervision of methods that learn from a tool's fields."""
