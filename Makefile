# Quick start: `make demo` then `make test`. Both create .venv when it is missing and install
# ferry with the extras they need (torch, onnxruntime CPU build, test tools).
PYTHON ?= python3
VENV ?= .venv
DATA_DIR ?= data
RUNS ?= runs
MODELS ?= models
RESNET_WEIGHTS ?= IMAGENET1K_V1
CALIB_DIR ?= ferry/samples/photos
BENCH_OUT ?= $(RUNS)/bench
# torch/torchvision are installed first, pinned: the releases ferry is tested with.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
BIN := $(VENV)/bin
STAMP := $(VENV)/.ferry-installed

FASHION_DIR ?= data/fashion
FASHION_IDX ?= /usr/share/datasets/fashion-mnist
# detection: the digit scenes (made from $(DATA_DIR)'s MNIST) and the detector trained on them
SCENES_DIR ?= data/digit-scenes
DETECT_RUN ?= $(RUNS)/digits
DETECTOR_ARCH ?= retinanet_resnet50_fpn_v2

.PHONY: help demo train export predict fidelity bench test docs clean fidelity-full train-avx2 int8-portability \
	finetune bench-batch bench-bf16 bench-serve bench-overload demo-detect scenes train-detect export-detect eval-detect numbers \
	bench-detect

help:
	@echo "make demo  [DATA_DIR=data]  train, export both models, predict samples, canvas fidelity, benchmark"
	@echo "make test  [DATA_DIR=data]  the test suite (real-MNIST tests skip when DATA_DIR lacks MNIST)"
	@echo "make bench [BENCH_OUT=...]  only the CPU/GPU benchmark of the models in $(MODELS)/"
	@echo "make docs                   the documentation site (mkdocs build --strict) into build/site/"
	@echo "more figures of the docs (after make demo): fidelity-full train-avx2 int8-portability finetune bench-batch bench-serve"
	@echo "                                            bench-overload bench-bf16"
	@echo "make demo-detect            digit scenes, the detector recipe (timed), its export, test-scene mAP, numbers read on the canvas"
	@echo "                            (after make demo: the numbers are also read with its digit model, as ferry draw does)"
	@echo "make bench-detect           a ResNet-50-FPN detector at 800x800: PyTorch vs onnxruntime (and OpenVINO) on this machine"

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e '.[train,cpu,openvino,dev,serve,scale,triton,docs]'
	touch $(STAMP)

demo: $(STAMP) train export predict fidelity bench

train: $(STAMP)
	$(BIN)/ferry train --data-dir $(DATA_DIR) --out $(RUNS)/mnist-cnn --overwrite

export: $(STAMP)
	$(BIN)/ferry export mnist-cnn --checkpoint $(RUNS)/mnist-cnn/checkpoint.pt --data-dir $(DATA_DIR) \
		--out $(MODELS) --int8 --fp16
	@# Random weights only when the pretrained ones are unavailable (exit code 3); any other failure stops the demo.
	$(BIN)/ferry export resnet50 --weights $(RESNET_WEIGHTS) --out $(MODELS) --int8 --fp16 --calib-dir $(CALIB_DIR); \
	rc=$$?; if [ $$rc -eq 3 ]; then \
		echo "*** ResNet-50 weights $(RESNET_WEIGHTS) unavailable (offline?): the demo exports RANDOM weights instead"; \
		$(BIN)/ferry export resnet50 --weights none --out $(MODELS) --int8 --fp16 --calib-dir $(CALIB_DIR); \
	elif [ $$rc -ne 0 ]; then exit $$rc; fi

predict: $(STAMP)
	$(BIN)/ferry predict $(MODELS)/mnist-cnn.onnx ferry/samples/digits
	$(BIN)/ferry predict $(MODELS)/resnet50.onnx ferry/samples/photos --top-k 3

fidelity: $(STAMP)
	$(BIN)/python -m ferry.bench.canvas_fidelity --model $(MODELS)/mnist-cnn.onnx --data-dir $(DATA_DIR) \
		--limit 2000 --out $(RUNS)/canvas_fidelity.json

bench: $(STAMP)
	$(BIN)/ferry bench --models-dir $(MODELS) --checkpoint $(RUNS)/mnist-cnn/checkpoint.pt --out $(BENCH_OUT)

# --- the docs' other figures (each writes into $(RUNS)/; the docs name the machine they came from) ---

fidelity-full: $(STAMP)
	$(BIN)/python -m ferry.bench.canvas_fidelity --model $(MODELS)/mnist-cnn.onnx --data-dir $(DATA_DIR) \
		--out $(RUNS)/canvas_fidelity_full.json

train-avx2: $(STAMP)
	@# the AVX2 instruction-set class on any x86 CPU: oneDNN and ATen restricted to AVX2 kernels
	ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 $(BIN)/ferry train --data-dir $(DATA_DIR) --out $(RUNS)/mnist-cnn-avx2 --overwrite

int8-portability: $(STAMP)
	$(BIN)/python -m ferry.bench.int8_portability --model $(MODELS)/mnist-cnn.onnx --data-dir $(DATA_DIR) \
		--emulate EPYC-Milan --out $(RUNS)/int8_portability.json

finetune: $(STAMP)
	$(BIN)/python -m ferry.bench.datasets fashion-mnist --idx-dir $(FASHION_IDX) --out $(FASHION_DIR) --train 5000 --test 2000
	$(BIN)/ferry train --overwrite --arch resnet18 --weights none --image-size 64 --data-dir $(FASHION_DIR) \
		--out $(RUNS)/fashion-resnet18
	$(BIN)/ferry export resnet18 --checkpoint $(RUNS)/fashion-resnet18/checkpoint.pt --name fashion-resnet18 \
		--out $(MODELS) --int8
	$(BIN)/ferry predict $(MODELS)/fashion-resnet18.int8.onnx $(FASHION_DIR)/val/sneaker --top-k 2 --json $(RUNS)/fashion-predict.json

bench-batch: $(STAMP)
	$(BIN)/python -m ferry.bench.batch_bench --models-dir $(MODELS) --data-dir $(DATA_DIR) --out $(RUNS)/batch-bench

bench-bf16: $(STAMP)
	@# OpenVINO's bf16 hint against f32 on this CPU (emulated where the CPU has no bf16 instructions, where ferry does not offer it)
	$(BIN)/python -m ferry.bench.openvino_bf16 --models-dir $(MODELS) --out $(RUNS)/openvino_bf16.json

bench-serve: $(STAMP)
	$(BIN)/python -m ferry.bench.loadtest --models-dir $(MODELS) --out $(RUNS)/serve-bench

# the serving page's overload figures (60 s at 4x the peak concurrency) and its speed bar (vs the minimal server)
bench-overload: $(STAMP)
	$(BIN)/python -m ferry.bench.loadtest --overload --models mnist-cnn --models-dir $(MODELS) --out $(RUNS)/serve-overload
	$(BIN)/python -m ferry.bench.loadtest --speed-bar --models mnist-cnn resnet50 --models-dir $(MODELS) --out $(RUNS)/serve-speed

# --- detection (docs: "Detection") ---

demo-detect: $(STAMP) scenes train-detect export-detect eval-detect numbers

scenes: $(STAMP)
	$(BIN)/python -m ferry.train.scenes --mnist-dir $(DATA_DIR) --out $(SCENES_DIR) --train 10000 --val 500 --test 1000

train-detect: $(STAMP)
	@# the default recipe (fcos_small from scratch); its metrics.json records the training time and the machine
	$(BIN)/ferry train --overwrite --task detect --data-dir $(SCENES_DIR)/train --annotations $(SCENES_DIR)/train.json \
		--val-data-dir $(SCENES_DIR)/val --val-annotations $(SCENES_DIR)/val.json --out $(DETECT_RUN)

export-detect: $(STAMP)
	$(BIN)/ferry export fcos_small --checkpoint $(DETECT_RUN)/checkpoint.pt --name digits --out $(MODELS) --fp16

eval-detect: $(STAMP)
	$(BIN)/python -m ferry.bench.detect_map --model $(MODELS)/digits.onnx --data-dir $(SCENES_DIR)/test \
		--annotations $(SCENES_DIR)/test.json --checkpoint $(DETECT_RUN)/checkpoint.pt --out $(RUNS)/digits-test-map.json \
		--figure $(RUNS)/digits-detections.png
	$(BIN)/ferry predict $(MODELS)/digits.onnx $(SCENES_DIR)/test/000000.png $(SCENES_DIR)/test/000001.png \
		$(SCENES_DIR)/test/000002.png --draw $(RUNS)/digits-drawn

numbers: $(STAMP)
	@# with make demo's digit model when it is there: the two-stage reading of ferry draw --detector, and the detector alone
	$(BIN)/python -m ferry.bench.canvas_numbers --model $(MODELS)/digits.onnx --data-dir $(DATA_DIR) --numbers 1000 \
		$(if $(wildcard $(MODELS)/mnist-cnn.onnx),--digits-model $(MODELS)/mnist-cnn.onnx) --out $(RUNS)/canvas_numbers.json

bench-detect: $(STAMP)
	@# random weights, seeded alike in the export and the PyTorch baseline: both sides get the same weights, so
	@# NMS gets the same work (a trained detector's baseline needs its checkpoint: --checkpoint MODEL=PATH)
	$(BIN)/ferry export $(DETECTOR_ARCH) --weights none --out $(MODELS)
	$(BIN)/ferry bench --models-dir $(MODELS) --models $(DETECTOR_ARCH) --backends torch-eager-cpu ort-cpu-fp32 ov-cpu-f32 \
		torch-eager-cuda ort-cuda-fp32 --out $(RUNS)/bench-detect

test: $(STAMP)
	FERRY_MNIST_DIR=$(DATA_DIR) $(BIN)/python -m pytest -q

docs: $(STAMP)
	$(BIN)/mkdocs build --strict

clean:
	rm -rf $(RUNS) $(MODELS) .pytest_cache
