"""Chat templates: `auto` (the inputs' most common), a built-in name, or a literal Jinja string.

The built-in names are mergekit's (`chatml`, `llama3`, `mistral`, `alpaca`, `exaone`), written
here from each family's published format. `chatml` and `mistral` render exactly as mergekit's
files do. mergekit's `llama3`, `alpaca` and `exaone` files leak their own line breaks into the
prompt (a newline after every llama3 turn, exaone's indentation, alpaca's generation prompt
glued to the last message); these render the formats as the model families define them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

# Built-in templates as one-line Jinja, so no line break of the source reaches the prompt.
TEMPLATES: dict[str, str] = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
        " + message['content'] | trim + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "mistral": (
        "{% if messages[0]['role'] == 'system' %}"
        "{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
        "{% else %}{% set turns = messages %}{% endif %}"
        "{{ bos_token }}{% for message in turns %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('after an optional system message, roles must alternate user/assistant') }}"
        "{% endif %}"
        "{% if message['role'] == 'user' %}"
        "{% if loop.first and system is defined %}"
        "{{ ' [INST] ' + system + '\\n\\n' + message['content'] + ' [/INST]' }}"
        "{% else %}{{ ' [INST] ' + message['content'] + ' [/INST]' }}{% endif %}"
        "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
        "{% else %}{{ raise_exception('only user and assistant roles, after an optional system message') }}"
        "{% endif %}{% endfor %}"
    ),
    "alpaca": (
        "{% set ns = namespace(first=true) %}"
        "{% for message in messages %}"
        "{% if message['role'] in ['system', 'user', 'user_context', 'assistant'] %}"
        "{% if not ns.first %}{{ '\\n\\n' }}{% endif %}{% set ns.first = false %}"
        "{% if message['role'] == 'user' %}{{ '### Instruction:\\n' }}"
        "{% elif message['role'] == 'user_context' %}{{ '### Input:\\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ '### Response:\\n' }}{% endif %}"
        "{{ message['content'] | trim }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}"
        "{% if not ns.first %}{{ '\\n\\n' }}{% endif %}{{ '### Response:\\n' }}{% endif %}"
    ),
    "exaone": (
        "{% for message in messages %}"
        "{% if loop.first and message['role'] != 'system' %}{{ '[|system|][|endofturn|]\\n' }}{% endif %}"
        "{{ '[|' + message['role'] + '|]' + message['content'] }}"
        "{% if message['role'] == 'user' %}{{ '\\n' }}{% else %}{{ '[|endofturn|]\\n' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}"
    ),
}
AUTO = "auto"
# mergekit's rule for telling a literal template from a name: a literal has a `{` and is at
# least this long (anything shorter cannot render a conversation).
MIN_LITERAL = 20


def template_problem(value: str) -> str | None:
    """Why `value` is neither `auto`, a built-in name nor a literal template (None if it is one)."""
    if value == AUTO or value in TEMPLATES:
        return None
    if "{" in value and len(value) >= MIN_LITERAL:
        return None
    from merge.errors import did_you_mean

    return (
        f"`{value[:60]}` is not a chat template: give `auto` (the inputs' most common), one of "
        f"{', '.join(TEMPLATES)}{did_you_mean(value, [AUTO, *TEMPLATES])}, or a literal Jinja "
        f"template (at least {MIN_LITERAL} characters, with `{{`)"
    )


def resolve_template(value: str, found: Iterable[str | dict[str, str] | None]) -> str | None:
    """The template text for `value`; `found` are the inputs' own templates, in input order
    (for `auto`: the most common one, ties to the first; None when no input has one)."""
    if value == AUTO:
        texts = []
        for t in found:
            if isinstance(t, dict):  # named templates: the default one, as mergekit takes
                t = t.get("default")
            if t:
                texts.append(t.strip())
        return Counter(texts).most_common(1)[0][0] if texts else None
    return TEMPLATES.get(value, value)
