from relibra.testing import check_policy


def test_snake_conforms():
    check_policy("snake", replicas="none", same_loads_move_nothing=True)
