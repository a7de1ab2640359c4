"""Recipes that turn raw datasets into the kit's WebDataset shards (see ``cheers_pl.data.schema``).

Each recipe module (``demo``, ``llava``, ``captions``, ``imagefolder``, ``text``) has
``add_arguments(parser)``, ``run(args) -> manifest`` and ``main(argv)``; all of them write through
:class:`data_recipes.writer.ShardSink`. ``python -m data_recipes demo --out data/demo`` builds the
bundled demo set.
"""
