"""Every megalong command: its flags, the checks that need no torch, then one package call.
setup.py installs them as console scripts; tools/*.py and examples/*.py are shims over them.

    megalong-train       train.py       training (examples/pretrain_longlora.py; launch.py is
                                        examples/pretrain_longlora.sh's torchrun launcher)
    megalong-convert     convert.py     HF <-> megalong checkpoints, PEFT adapters
    megalong-eval-ppl    eval_ppl.py    long-document perplexity
    megalong-passkey     passkey.py     passkey retrieval
    megalong-generate    generate.py    text generation
    megalong-preprocess  preprocess.py  text -> IndexedDataset
    megalong-tokenizer   tokenizer.py   train a sentencepiece tokenizer
    megalong-plan        plan.py        memory and FLOPs of a layout, before launching it
    megalong-report      report.py      perplexity reports side by side
    (tools/make_random_model.py: random_model.py, for demos and benchmarks)
"""
