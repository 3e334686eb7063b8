"""The LLaMA recipes' prompts as text (torch-free).

- NER (`llama_ner`'s training template, Chinese-LLaMA-Alpaca-LoRA-Tuning's dataset.py): the Alpaca instruction
  template around instruct + "\\n" + query; "<s>" opens every trained answer and "</s>" closes it.
- Alpaca (the original chat_ner.py's generation template, behind --original_prompt): blank lines after
  "### Instruction:" and "### Response:", BOS first; it differs from what the NER adapters were trained on.
"""

NER_TEMPLATE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response: "
)
ALPACA_TEMPLATE = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\n\n{instruction}\n\n### Response:\n\n")
ANSWER_OPEN, ANSWER_CLOSE = "<s>", "</s>"


def build_source(instruction: str, query) -> str:
    """The NER training prompt: instruction + "\\n" + query (unless the query is None or empty) in the template."""
    if query is not None and query != "":
        instruction = instruction + "\n" + query
    return NER_TEMPLATE.format_map({"instruction": instruction})


def generate_prompt(instruction: str, input: str | None = None) -> str:
    """The original chat_ner.py prompt (the Alpaca template)."""
    if input:
        instruction = instruction + "\n" + input
    return ALPACA_TEMPLATE.format_map({"instruction": instruction})


# The same prompts as chat templates (Jinja, for engines that render OpenAI messages themselves: vLLM, TGI, plain
# transformers' apply_chat_template), generated from the templates above so there is one definition. Single-turn,
# as trained: the last user message is the instruction. Rendered text is tokenized without added special tokens.
_LAST_USER = ("{%- set ns = namespace(text='') -%}{%- for m in messages -%}{%- if m['role'] == 'user' -%}"
              "{%- set ns.text = m['content'] if m['content'] is string else '' -%}{%- endif -%}{%- endfor -%}")


def _jinja_text(text: str) -> str:
    return text.replace("{instruction}", "{{ ns.text }}")


# "<s>" opens the answer (as NerCollate trains): the BOS token right after the template's trailing space.
NER_CHAT_TEMPLATE = _LAST_USER + _jinja_text(NER_TEMPLATE) + "{{ bos_token }}"
# (the closing `{{ "" }}`: Jinja drops a final newline of the template source, the prompt ends in two)
ALPACA_CHAT_TEMPLATE = _LAST_USER + "{{ bos_token }}" + _jinja_text(ALPACA_TEMPLATE) + "{{ \"\" }}"
