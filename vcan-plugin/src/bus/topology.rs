//! Which can-gw rules connect two members: the full mesh (see the module above).

use crate::kernel::cangw::{Filter, Rule};
use crate::kernel::link::CanMtu;

use super::Member;

/// The rules that deliver frames from `src` to `dst`: one per filter of `dst` (or one without a
/// filter), each for classic frames and, on an FD bus, for FD frames.
pub(super) fn rules_between(src: &Member, dst: &Member, mtu: CanMtu) -> Vec<Rule> {
    let filters: Vec<Option<Filter>> = if dst.filters.is_empty() {
        vec![None]
    } else {
        dst.filters.iter().copied().map(Some).collect()
    };
    let mut rules = Vec::new();
    for filter in filters {
        let mut kinds = vec![Rule::classic(src.bus_index, dst.bus_index)];
        if mtu == CanMtu::Fd {
            kinds.push(Rule::can_fd(src.bus_index, dst.bus_index));
        }
        for rule in kinds {
            rules.push(match filter {
                Some(f) => rule.with_filter(f.id, f.mask),
                None => rule,
            });
        }
    }
    rules
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::frame::{CAN_EFF_FLAG, CAN_SFF_MASK};
    use crate::pod::resources::PodRef;

    #[test]
    fn rules_between_members_honour_filters_and_fd() {
        let member = |i, filters| Member {
            pod: PodRef {
                namespace: "d".into(),
                name: format!("p{i}"),
            },
            sandbox: format!("s{i}"),
            bus_end: format!("m{i:04}"),
            bus_index: i,
            filters,
        };
        let a = member(2, vec![]);
        let f = Filter {
            id: 0x123,
            mask: CAN_SFF_MASK | CAN_EFF_FLAG,
        };
        let b = member(3, vec![f]);
        assert_eq!(
            rules_between(&a, &b, CanMtu::Classic),
            [Rule::classic(2, 3).with_filter(f.id, f.mask)]
        );
        assert_eq!(
            rules_between(&b, &a, CanMtu::Fd),
            [Rule::classic(3, 2), Rule::can_fd(3, 2)]
        );
    }
}
