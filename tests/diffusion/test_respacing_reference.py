"""space_timesteps against a reference written to follow improved-diffusion's respace.space_timesteps line by line
(openai/improved-diffusion, improved_diffusion/respace.py), which returns a set; ours returns it sorted."""

import pytest

from pakhsh.diffusion import space_timesteps


def improved_diffusion_space_timesteps(num_timesteps: int, section_counts: str) -> set[int]:
    """The reference: a float running position rounded per step, sections sized T // k (+1 for the first T % k)."""
    if section_counts.startswith("ddim"):
        desired = int(section_counts[len("ddim"):])
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == desired:
                return set(range(0, num_timesteps, stride))
        raise ValueError(f"cannot create exactly {desired} steps with an integer stride")
    counts = [int(c) for c in section_counts.split(",")]
    size_per = num_timesteps // len(counts)
    extra = num_timesteps % len(counts)
    start_idx = 0
    all_steps: list[int] = []
    for i, section_count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise ValueError(f"cannot divide section of {size} steps into {section_count}")
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        cur_idx = 0.0
        taken = []
        for _ in range(section_count):
            taken.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        all_steps += taken
        start_idx += size
    return set(all_steps)


@pytest.mark.parametrize("steps,counts", [(1000, range(1, 1001)), (4000, [*range(1, 1001), *range(1001, 4001, 7)])])
def test_every_single_count_matches_improved_diffusion(steps, counts):
    # before the running-sum fix, 278 of the 1000 counts differed at T = 1000 (the first: "21"), 1263 of 4000 at
    # T = 4000; every count at T = 1000, and at T = 4000 all up to 1000 and every 7th above (to stay fast)
    bad = [n for n in counts
           if space_timesteps(steps, str(n)) != sorted(improved_diffusion_space_timesteps(steps, str(n)))]
    assert bad == []


def test_count_21_at_1000_is_improved_diffusions():
    # stride 999 / 20 = 49.95: after 10 additions the running sum is 499.49999999999994 (-> 499), while
    # 10 * 49.95 = 499.5 rounds half-to-even to 500; improved-diffusion keeps 499
    kept = space_timesteps(1000, "21")
    assert 499 in kept and 500 not in kept
    assert kept == sorted(improved_diffusion_space_timesteps(1000, "21"))


@pytest.mark.parametrize("steps", [1000, 4000, 1001, 999])
@pytest.mark.parametrize(
    "spec", ["10,15,20", "1,2,3", "21,21,21", "7,13", "50,50,50,50", "3,1,4,1,5,9,2,6", "99,1", "250,17,33"]
)
def test_section_specs_match_improved_diffusion(steps, spec):
    assert space_timesteps(steps, spec) == sorted(improved_diffusion_space_timesteps(steps, spec))


@pytest.mark.parametrize("steps", [1000, 4000])
@pytest.mark.parametrize("count", [1, 2, 10, 25, 50, 100, 250, 333, 500])
def test_ddim_spacing_matches_improved_diffusion(steps, count):
    try:
        expected = sorted(improved_diffusion_space_timesteps(steps, f"ddim{count}"))
    except ValueError:
        with pytest.raises(ValueError):
            space_timesteps(steps, f"ddim{count}")
        return
    assert space_timesteps(steps, f"ddim{count}") == expected
