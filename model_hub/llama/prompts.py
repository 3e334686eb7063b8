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
