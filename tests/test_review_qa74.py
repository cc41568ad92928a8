"""QA74/QA75 (session 25): the closed issues' checkable requirements, audited (84 + 26 checks, all
met but one wording): integer task inputs for a float model were refused as a *shape* problem
("the model cannot take task inputs of shape (1,) per point: mat1 and mat2 must have the same
dtype…"); now the ``ValueError`` names the dtype, what integer inputs are for and how to
convert them."""
import pytest
import torch

from reptile_fast import MLP, Reptile, TaskBatch


@pytest.mark.parametrize("backend", ["reference", "torch", "auto"])
def test_integer_inputs_for_a_float_model_name_the_dtype(backend):
    tasks = TaskBatch(torch.zeros(2, 50, 1, dtype=torch.long), torch.zeros(2, 50, 1))
    with pytest.raises(ValueError, match=r"cannot take task inputs of dtype torch.int64: integer inputs are ids, "
                                         r"for a model that starts with an nn.Embedding"):
        Reptile(MLP(), backend=backend).meta_step(tasks)


def test_integer_ids_for_an_embedding_model_still_run():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Flatten(1), torch.nn.Linear(4, 1))
    tasks = TaskBatch(torch.randint(0, 10, (2, 20, 1)), torch.randn(2, 20, 1))
    Reptile(model, backend="torch", inner_batch_size=5).meta_step(tasks)
