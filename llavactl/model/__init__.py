"""The model side: sources (builtin, local folders, the Hugging Face cache), LLaVA assembly for a
stage, and saving what a stage trains.

Entry points: `sources.load_tokenizer`, `sources.tower_image_spec`, `assembly.build_llava`,
`weights.save_trainable` / `weights.load_trainable`.
"""
