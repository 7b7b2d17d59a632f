from diffc.ir import StepTracker


def test_steps_follow_decreasing_timesteps_and_new_loops():
    tracker = StepTracker()
    assert tracker.observe(999.0) and tracker.step == 0
    assert not tracker.observe(500.0) and tracker.step == 1
    assert not tracker.observe(500.0) and tracker.step == 1 and tracker.call_in_step == 1
    assert not tracker.observe(1.0) and tracker.step == 2
    assert tracker.observe(999.0) and tracker.step == 0  # a larger timestep starts a new loop


def test_begin_loop_and_reset():
    tracker = StepTracker()
    tracker.begin_loop(num_steps=4)
    assert tracker.observe(10.0) and tracker.num_steps == 4
    tracker.observe(5.0)
    assert tracker.step == 1
    tracker.observe(10.0)  # new loop not announced: its length is unknown
    assert tracker.step == 0 and tracker.num_steps is None
    tracker.reset()
    assert tracker.step == -1 and tracker.last_timestep is None


def test_without_timestep_every_call_is_step_zero():
    tracker = StepTracker()
    assert tracker.observe(None) and tracker.observe(None) and tracker.step == 0


def test_a_loop_of_another_length_follows_the_calibrated_timesteps():
    from diffc.ir import Schedule

    calibrated = Schedule(default="full", steps=("full", "cached", "full", "cached", "full"),
                          timesteps=(999.0, 799.0, 599.0, 399.0, 199.0))
    same_loop = [calibrated.variant_for(i, None, t) for i, t in enumerate(calibrated.timesteps)]
    assert same_loop == list(calibrated.steps)
    # ten unannounced steps over the same range: each gets the variant of the nearest calibrated step,
    # where position alone would run the first five entries and then the default
    longer = [calibrated.variant_for(i, None, 999.0 - 100.0 * i) for i in range(10)]
    assert longer == ["full", "full", "cached", "cached", "full", "full", "cached", "cached", "full", "full"]
    assert calibrated.variant_for(3, None, None) == "cached"  # no timestep: by position
    assert Schedule.from_json(calibrated.to_json()) == calibrated


def test_the_last_step_is_known_from_the_announced_length_or_the_calibrated_timesteps():
    tracker = StepTracker()
    tracker.begin_loop(num_steps=2)
    tracker.observe(10.0)
    assert not tracker.at_last_step()
    tracker.observe(5.0)
    assert tracker.at_last_step() and tracker.at_last_step((99.0,))  # the announced length decides
    calibrated = (999.0, 499.0, 1.0)
    tracker.reset()
    for t in calibrated:
        assert not tracker.at_last_step(calibrated)
        tracker.observe(t)
    assert tracker.at_last_step(calibrated)
    tracker.observe(1.0)  # another call of the same step
    assert tracker.at_last_step(calibrated)
    for loop in ((999.0, 500.0, 1.0), (999.0, 499.0, 1.0, 0.5)):  # another spacing, or a longer loop
        tracker.reset()
        for t in loop:
            tracker.observe(t)
        assert not tracker.at_last_step(calibrated)
    tracker.reset()
    tracker.observe(None)
    assert not tracker.at_last_step(calibrated) and not tracker.at_last_step()
