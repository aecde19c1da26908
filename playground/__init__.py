"""The PaliGemma playground behind `app.py`: model registry, model manager, one request, task presets.

registry.build(demo_folder, file, env) -> Registry        which models the page offers
ModelManager(registry).get(name, progress) -> ReadyModel  loaded on first use, unloaded when memory is short
Playground(manager).run(image, prompt, model, ...)        one request, streamed to the page and the API
prompts.compose / split / load_examples                   task presets and the example gallery
"""
