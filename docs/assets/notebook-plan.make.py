"""Makes the notebook behind docs/assets/notebook-plan.png: run it, then
``jupyter nbconvert --to html --execute plan.ipynb`` and a headless Chromium screenshot of plan.html."""

import nbformat

nb = nbformat.v4.new_notebook()
nb.cells = [
    nbformat.v4.new_code_cell(
        "%%capture\nimport torch, kbitprep\n"
        "from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM\n"
        "torch.manual_seed(0)\n"
        "cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,\n"
        "                  num_key_value_heads=2, vocab_size=256)\n"
        "LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained('tiny-llama')\n"
        "model = AutoModelForCausalLM.from_pretrained('tiny-llama', quantization_config=BitsAndBytesConfig(\n"
        "    load_in_4bit=True, bnb_4bit_quant_type='nf4', bnb_4bit_use_double_quant=True,\n"
        "    bnb_4bit_compute_dtype=torch.bfloat16))"
    ),
    nbformat.v4.new_code_cell("kbitprep.plan(model, upcast='norms')"),
]
nbformat.write(nb, "plan.ipynb")
