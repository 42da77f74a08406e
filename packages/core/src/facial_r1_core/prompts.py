"""Prompt templates of the paper's Appendix C: SFT/inference prompt, ground-truth and error blocks.

The allowed emotions are rendered as a clean list (the reference code leaked ``dict_keys([...])``).

>>> p = sft_prompt("How does this person feel?", ["anger", "fear"])
>>> p.splitlines()[1], "Use a single word from anger, fear." in p
('How does this person feel?', True)
>>> "MUST be this exact emotion: fear" in synthesis_prompt("q", ["fear"], ["AU1"], "fear")
True
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from .vocab import BASIC_EMOTIONS, PROMPT_AUS, emotion_list_text

DEFAULT_QUESTION = (
    "Analyze the facial expression in this image: which Action Units are active, "
    "and what emotion do they show?"
)

_AU_DEFINITIONS = "\n".join(f"- {code}: {name};" for code, name in PROMPT_AUS.items())
# The paper's last definition ends with a full stop.
_AU_DEFINITIONS = _AU_DEFINITIONS[:-1] + "."

EXAMPLE_COMPLETION = (
    "<think>In analyzing the facial expression, key Action Units include upper lip raising (AU10), "
    "chin raising (AU17), and lip funneling (AU22). The upper lip raised indicates a display of "
    "disdain or hostility, while the chin raised suggests a feeling of defiance or assertiveness. "
    "The lip funneling can indicate tension or frustration in the expression. Together, these AUs "
    "coalesce to portray a strong emotional state where the individual might feel anger or strong "
    "irritation. The combination of disdain, defiance, and tension clearly signifies an intense "
    "emotional reaction, thus pointing towards anger as the primary emotion.</think>\n"
    "<answer>anger</answer>"
)

SFT_PROMPT_TEMPLATE = """### Question
{question}
### Requirements
First, output the thinking process in <think>...</think> tags.
- Provide a concise and precise analysis as a continuous paragraph focusing on the critical Action Units (AUs).
- Describe the observable facial features with AU numbers in parentheses (e.g., "eyebrows pulled together (AU4)").
- After analyzing the possible AUs present in the face, explain how these AUs collectively indicate a specific emotion.
- Forbidden to use negative or uncertain expressions such as "no", "not", "without" or "maybe".
- Reduce unnecessary talk and be as concise as possible.
After the thinking process, output only the final emotion in <answer>...</answer> tags.
- Use a single word from {emotions}.
### AU Definition
The following are the definitions of Action Units:
{au_definitions}
### Example
This is an example that meets the requirements:
{example}"""  # noqa: E501 - the paper's wording, line for line

GROUND_TRUTH_TEMPLATE = """### Ground Truth
Your analysis MUST identify these specific Action Units: {true_aus}
And your final answer MUST be this exact emotion: {true_emotion}"""

ERROR_TEMPLATE = """### Previous Response Issues
Here is your previous response:
{prev_response}
Your previous response had the following issues:
{errors}
Please correct these issues in your new response. Make sure to:
1. Include all required Action Units in your analysis
2. Provide the correct emotion in your answer
3. Use proper <think>...</think> and <answer>...</answer> tags
4. Avoid negative expressions like "no", "not", "without"
5. Be concise and precise"""


def sft_prompt(question: str = DEFAULT_QUESTION, emotions: Iterable[str] = BASIC_EMOTIONS) -> str:
    """The SFT prompt, also the GRPO and inference prompt (no ground truth)."""
    return SFT_PROMPT_TEMPLATE.format(
        question=question,
        emotions=emotion_list_text(emotions),
        au_definitions=_AU_DEFINITIONS,
        example=EXAMPLE_COMPLETION,
    )


inference_prompt = sft_prompt


def ground_truth_block(true_aus: Sequence[str], true_emotion: str) -> str:
    """The GT block that pins the AUs and the emotion the synthesis must produce.

    >>> print(ground_truth_block(["AU6", "AU12"], "happiness"))
    ### Ground Truth
    Your analysis MUST identify these specific Action Units: AU6, AU12
    And your final answer MUST be this exact emotion: happiness
    """
    return GROUND_TRUTH_TEMPLATE.format(
        true_aus=", ".join(true_aus) if true_aus else "(none annotated)",
        true_emotion=true_emotion or "(none annotated)",
    )


def error_block(prev_response: str, errors: Sequence[str]) -> str:
    """The reflective block: the previous response and what was wrong with it."""
    return ERROR_TEMPLATE.format(prev_response=prev_response, errors="; ".join(errors))


def synthesis_prompt(
    question: str,
    emotions: Iterable[str],
    true_aus: Sequence[str],
    true_emotion: str,
    prev_response: str | None = None,
    errors: Sequence[str] | None = None,
) -> str:
    """SFT prompt + ground-truth block (+ error block when retrying after a rejected answer)."""
    parts = [sft_prompt(question, emotions), ground_truth_block(true_aus, true_emotion)]
    if prev_response is not None:
        parts.append(error_block(prev_response, errors or ()))
    return "\n".join(parts)
