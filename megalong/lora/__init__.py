"""LoRA inside megatron-core's tensor-parallel linears, plus trainable embedding and norms
("LoRA+" in the LongLoRA paper): see DESIGN.md §7 and docs/ARCHITECTURE.md.

merge.py   pure tensor math (scale, init, qkv/fc1 part layout, merge deltas)
adapters.py the TP-aware adapter module attached to a column/row-parallel linear
apply.py   add adapters to a built model, choose the trainable parameters, merge
peft_io.py PEFT adapter directories <-> adapters (export at TP=1, import at any TP)
"""
