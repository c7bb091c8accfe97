import os, pytest, torch
# Tests run on 2 CPU cores; keep torch from oversubscribing them.
torch.set_num_threads(min(2, os.cpu_count() or 1))

def pytest_configure(config):
    config.addinivalue_line('markers', 'gpu: needs a CUDA device; skipped where there is none')

def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available(): return
    skip = pytest.mark.skip(reason='no CUDA device here (the gpu tests run the paper dry run on a GPU)')
    for item in items:
        if 'gpu' in item.keywords: item.add_marker(skip)
