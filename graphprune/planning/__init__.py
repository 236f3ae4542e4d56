"""Planning: importance criteria, the planner that turns a target into a plan, and the plan itself."""
