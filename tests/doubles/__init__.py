"""In-process test doubles of the products RackTwin talks to, validated against their published contracts."""
