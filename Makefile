# Two commands do everything on a fresh machine:  make demo  and  make test
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mbexport-installed

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/install.sh
	bash scripts/install.sh $(VENV)
	touch $@

demo: $(STAMP)
	bash scripts/demo.sh $(VENV)

test: $(STAMP)
	$(VENV)/bin/pytest -q

clean:
	rm -rf artifacts/demo
