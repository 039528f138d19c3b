"""Names of decoding strategies and the fixed-steps schedule (torch-free, so pure-logic cores
and the simulator can use them)."""

DREAM_ALGORITHMS = ("origin", "maskgit_plus", "topk_margin", "entropy")
REMASKING = ("low_confidence", "random")


def fixed_schedule(num_masked: int, steps: int) -> list[int]:
    """LLaDA's get_num_transfer_tokens for one request: even split, remainder first."""
    base, rem = divmod(num_masked, steps)
    return [base + (1 if i < rem else 0) for i in range(steps)]


def scheduled_count(num_masked_at_block_start: int, steps_per_block: int, step: int, num_queries: int) -> int:
    """How many of ``num_queries`` queried positions the fixed-steps schedule commits at ``step``
    of a block that began with ``num_masked_at_block_start`` masked positions (past the last
    step: all of them)."""
    schedule = fixed_schedule(num_masked_at_block_start, steps_per_block)
    return min(schedule[step] if step < len(schedule) else num_queries, num_queries)
