from slidecache.labels import distinct_labels


def test_a_name_given_again_is_numbered_from_its_second_time():
    assert distinct_labels(["virchow2", "uni2-h", "virchow2", "virchow2"]) == ["virchow2", "uni2-h", "virchow2#2",
                                                                              "virchow2#3"]
    assert distinct_labels([]) == []
