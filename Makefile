# Developer shortcuts. `make docs` builds the offline docs site into site/ (executes every notebook; cached in
# build/docs/executed/), `make readme` regenerates README.md from nbs/index.ipynb, `make test` runs the tests.
.PHONY: docs readme test

docs:
	python docs/build_docs.py

readme:
	python docs/build_docs.py --readme

test:
	python docs/nbdev_test_keep.py && pytest
