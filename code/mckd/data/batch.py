"""The batch contract between the data pipeline and everything downstream.

A training batch is a plain ``dict[str, torch.Tensor]`` built by the collator. Keys:

Student side (always present), ``T_s`` = longest student sequence in the batch (dynamic padding):
    input_ids        (B, T_s) long   prompt + response[:-1], right-padded with the student pad id
    attention_mask   (B, T_s) long   1 on real tokens, 0 on padding
    position_ids     (B, T_s) long   0..n-1 on real tokens, 0 on padding
    labels           (B, T_s) long   next-token targets already shifted (labels[:, i] is what
                                     position i must predict); -100 on prompt and padding
    offsets          (B, T_s, 2) long  character span [start, end) of each *input* token in the
                                     example's text ``prompt + output`` (0, 0 on padding)

Teacher side (present when a teacher tokenizer is configured), same meaning, ``T_t``:
    teacher_input_ids, teacher_attention_mask, teacher_position_ids, teacher_labels,
    teacher_offsets

Alignment features (present only when the criterion asks for them via ``Criterion.alignment``):
    see :mod:`mckd.data.alignment` for the exact keys and shapes.

Bookkeeping:
    example_index    (B,) long       row of the example in its split (for resume and debugging)

``labels == -100`` is the only label mask anywhere in the project.
"""

IGNORE_INDEX = -100

STUDENT_KEYS = ("input_ids", "attention_mask", "position_ids", "labels", "offsets")
TEACHER_PREFIX = "teacher_"


def teacher_key(name: str) -> str:
    """``teacher_key("input_ids") == "teacher_input_ids"``."""
    return TEACHER_PREFIX + name
