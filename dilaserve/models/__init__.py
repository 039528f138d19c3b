"""Native dLLM implementations loaded from their published checkpoint formats."""
