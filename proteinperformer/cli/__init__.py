"""The ``pp-*`` commands, one thin module each: parse options, call the package, print. They share
:mod:`.common` (dashed options, ``--device``, ``--debug``, one-line errors).

========================  ========================================================
``pp-train``              :mod:`.train` (Hydra)
``pp-preprocess``         :mod:`.preprocess`
``pp-embed``              :mod:`.embed`
``pp-generate``           :mod:`.generate`
``pp-probe``              :mod:`.probe`
``pp-evaluate``           :mod:`.evaluate`
``pp-convert``            :mod:`.convert`
``pp-contacts``           :mod:`.contacts`
``pp-attention-blosum``   :mod:`.attention_blosum`
``pp-gpu-check``          :mod:`.gpu_check`
========================  ========================================================
"""
