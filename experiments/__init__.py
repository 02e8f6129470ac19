"""The paper reproductions behind benchmarks/RESULTS.md -- beside the convbn library, not shipped in its wheel.

* :mod:`.sweep`       -- paper Table 6 / Fig. 3: modes x batch sizes x input sizes
* :mod:`.appendix_m`  -- report, gamma/sqrt(var+eps) (Fig. 2a), Appendix M saving per block
* :mod:`.transfer`    -- paper Tables 3/7: fine-tuning pretrained MobileNetV2 on real digits
* :mod:`.adversarial` -- paper Table 10: FGSM/PGD in eval vs tune
* :mod:`.plots`       -- the PNGs (matplotlib, Agg)
* :mod:`.results_md`  -- benchmarks/RESULTS.md from the JSON files, next to the paper's tables
* :mod:`.models`, :mod:`.data` -- the small ResNet, MobileNetV2 (+ offline ImageNet weights), digits

Run them with ``python -m experiments COMMAND`` from the repository root; the modes-side-by-side
comparison and the meters they use are the library's (:mod:`convbn.bench`).
"""
