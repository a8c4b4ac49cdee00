import numpy as np
import pytest
import torch

from iak_dist.data.sampler import DomainBatchSampler, domain_normalised_mean, domain_probabilities


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_domain_frequencies_follow_n_to_the_alpha(alpha):
    counts = np.array([5000, 500, 50])
    domains = np.repeat(np.arange(3), counts)
    sampler = DomainBatchSampler(domains, 3, batch_size=1000, alpha=alpha, seed=1)
    drawn = np.concatenate([domains[sampler.next_batch()] for _ in range(60)])
    freq = np.bincount(drawn, minlength=3) / len(drawn)
    expected = counts**alpha / (counts**alpha).sum()
    np.testing.assert_allclose(freq, expected, atol=0.01)
    np.testing.assert_allclose(domain_probabilities(counts, alpha), expected)


def test_each_domain_cycles_through_all_its_rows_before_repeating():
    domains = np.repeat(np.arange(2), [30, 7])
    sampler = DomainBatchSampler(domains, 2, batch_size=8, alpha=0.0, seed=3)
    seen = [i for _ in range(40) for i in sampler.next_batch().tolist() if domains[i] == 1]
    first_round = seen[:7]
    assert sorted(first_round) == list(range(30, 37))


def test_state_dict_resumes_the_same_sequence():
    domains = np.random.default_rng(0).integers(0, 4, 1000)
    a = DomainBatchSampler(domains, 4, 64, 0.5, seed=7)
    for _ in range(5):
        a.next_batch()
    state = a.state_dict()
    expected = [a.next_batch() for _ in range(20)]
    b = DomainBatchSampler(domains, 4, 64, 0.5, seed=7)
    b.load_state_dict(state)
    for want in expected:
        np.testing.assert_array_equal(b.next_batch(), want)


def test_domain_normalised_mean_averages_domain_means():
    loss = torch.tensor([1.0, 3.0, 10.0, 0.0])
    domain = torch.tensor([0, 0, 2, 2])
    # domain 0 mean 2, domain 2 mean 5, domain 1 absent -> (2 + 5) / 2
    assert float(domain_normalised_mean(loss, domain, 3)) == pytest.approx(3.5)


def test_domain_normalised_mean_has_no_data_dependent_shape():
    """Meta tensors carry no data: an op whose output size depends on the values (`bincount`, boolean-mask
    indexing) cannot run on them, and on CUDA each such op is a host sync per training step."""
    loss = torch.tensor([1.0, 3.0, 10.0, 0.0, 4.0], requires_grad=True)
    domain = torch.tensor([0, 0, 2, 2, 2])
    value = domain_normalised_mean(loss, domain, 4)
    assert float(value) == pytest.approx((2.0 + 14.0 / 3) / 2)
    value.backward()  # each row weighs 1 / (rows of its domain * domains present)
    torch.testing.assert_close(loss.grad, torch.tensor([1 / 4, 1 / 4, 1 / 6, 1 / 6, 1 / 6]))
    on_meta = domain_normalised_mean(loss.detach().to("meta"), domain.to("meta"), 4)
    assert on_meta.shape == () and on_meta.device.type == "meta"
