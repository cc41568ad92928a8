"""Review items taken from earlier rounds (QA68, QA69, QA72, QA73) in session 26.

1. ``Episodes`` whose query set holds a class its task's support set lacks was accepted: that query
   point is scored against a class the learner never adapted on, and the accuracy came out lower
   with nothing said (QA69).
"""
import pytest
import torch

from reptile_fast.tasks import Episodes, TaskBatch


def _episodes(support_y, query_y, ways):
    g = torch.Generator().manual_seed(0)
    s = torch.tensor(support_y)
    q = torch.tensor(query_y)
    return Episodes(TaskBatch(torch.rand(*s.shape, 1, 4, 4, generator=g), s),
                    TaskBatch(torch.rand(*q.shape, 1, 4, 4, generator=g), q), ways)


def test_episodes_refuse_a_query_class_the_support_set_lacks():
    with pytest.raises(ValueError, match=r"query label 2 of task 1 \(point 0\).*support set \(its labels: \[0, 1\]\)"):
        _episodes([[0, 1, 2], [0, 1, 1]], [[2, 1, 0], [2, 0, 1]], 3)


def test_episodes_accept_queries_drawn_from_each_tasks_own_support_classes():
    # a task may use fewer classes than ``ways`` as long as its queries are among them
    ep = _episodes([[2, 0, 1], [1, 1, 0]], [[0, 1, 2], [0, 1, 1]], 3)
    assert ep.n_tasks == 2
