"""Progress bars of methods report to the job driver inside `reporting`, and draw nothing there."""

from workbench.progress import reporting, tqdm


def test_a_bar_inside_reporting_hands_its_counts_to_the_callback_and_prints_nothing(capsys):
    seen = []
    with reporting(lambda desc, n, total: seen.append((desc, n, total))):
        for _ in tqdm(range(5), desc="edges", mininterval=0):
            pass
        with tqdm(total=3, desc="prompts") as bar:
            bar.update(2)
    assert ("edges", 5, 5) in seen and seen[0] == ("edges", 0, 5)
    assert ("prompts", 2, 3) in seen
    assert all(n <= total for _, n, total in seen)
    assert capsys.readouterr().err == ""
    from tqdm.auto import tqdm as terminal

    outside = tqdm(range(2), desc="plain", disable=True)  # outside the block: tqdm's own bar again
    assert type(outside) is terminal and list(outside) == [0, 1]
