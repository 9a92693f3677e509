"""Make the synthetic training set on first use: data.generate_if_missing names a generator (faces or
the simple synthetic objects) and the run's data source (cluster/data_source.py) runs it when data.root has
no split yet."""

from __future__ import annotations

import logging
from pathlib import Path

from trainer.config import RunConfig

log = logging.getLogger(__name__)


def generate_if_missing(config: RunConfig) -> None:
    """Generate the synthetic set into data.root when asked to and it is not there yet."""
    root = Path(config.data.root)
    gen = config.data.generate_if_missing
    if gen is None or (root / config.data.split).is_dir():
        return
    log.info("generating synthetic %s into %s", gen.kind, root)
    if gen.kind == "faces":
        from trainer.data.face_generator import generate_faces
        from trainer.data.face_sampling import FaceConfig

        generate_faces(str(root), FaceConfig(image_size=config.model.image_size, num_train=gen.num_train,
                                             num_val=gen.num_val, num_test=gen.num_test, seed=gen.seed,
                                             background=gen.background))
        return
    from trainer.data.synthetic import main_generate

    main_generate(str(root), config.model.image_size, gen.num_train, gen.num_val, gen.num_test, gen.seed, gen.background,
                  gen.albedo_hues)
