"""CuPy GPU engine. Built in issue 5; nothing on the plan path imports it."""
