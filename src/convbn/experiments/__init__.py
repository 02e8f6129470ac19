"""The measurements and experiments behind the ``convbn`` CLI, importable and testable.

* :mod:`.compare`     -- modes side by side on one model (the default run)
* :mod:`.sweep`       -- paper Table 6 / Fig. 3: modes x batch sizes x input sizes
* :mod:`.appendix_m`  -- report, gamma/sqrt(var+eps) (Fig. 2a), Appendix M saving per block
* :mod:`.transfer`    -- paper Tables 3/7: fine-tuning pretrained MobileNetV2 on real digits
* :mod:`.adversarial` -- paper Table 10: FGSM/PGD in eval vs tune
* :mod:`.plots`       -- the PNGs (matplotlib, Agg)
"""
