//! Common English given-name variants (Bill/William). Both directions, normalised lowercase.

const GROUPS: &[&[&str]] = &[
    &["william", "bill", "billy", "will", "willy", "liam"],
    &["robert", "bob", "bobby", "rob", "robbie", "bert"],
    &["richard", "rick", "ricky", "dick", "rich", "richie"],
    &["james", "jim", "jimmy", "jamie"],
    &["john", "jack", "johnny", "jon"],
    &["jonathan", "jon", "jonny"],
    &["joseph", "joe", "joey"],
    &["michael", "mike", "mikey", "mick"],
    &["thomas", "tom", "tommy"],
    &["charles", "charlie", "chuck", "chas"],
    &["christopher", "chris", "kit"],
    &["daniel", "dan", "danny"],
    &["david", "dave", "davey"],
    &["edward", "ed", "eddie", "ted", "ned"],
    &["henry", "hank", "harry"],
    &["anthony", "tony"],
    &["andrew", "andy", "drew"],
    &["benjamin", "ben", "benny"],
    &["samuel", "sam", "sammy"],
    &["matthew", "matt"],
    &["nicholas", "nick", "nicky"],
    &["patrick", "pat", "paddy"],
    &["peter", "pete"],
    &["stephen", "steve", "steven"],
    &["timothy", "tim", "timmy"],
    &["alexander", "alex", "sandy", "xander"],
    &["gregory", "greg"],
    &["lawrence", "larry"],
    &["ronald", "ron", "ronnie"],
    &["donald", "don", "donnie"],
    &["kenneth", "ken", "kenny"],
    &["raymond", "ray"],
    &["gerald", "gerry", "jerry"],
    &["frederick", "fred", "freddie"],
    &[
        "elizabeth",
        "liz",
        "beth",
        "betty",
        "eliza",
        "lizzie",
        "betsy",
    ],
    &["margaret", "maggie", "meg", "peggy", "marge"],
    &["katherine", "kate", "kathy", "katie", "kitty"],
    &["catherine", "cathy", "kate", "cat"],
    &["jennifer", "jen", "jenny"],
    &["patricia", "pat", "patty", "trish"],
    &["susan", "sue", "susie"],
    &["deborah", "deb", "debbie"],
    &["rebecca", "becky", "becca"],
    &["jessica", "jess", "jessie"],
    &["barbara", "barb", "babs"],
    &["dorothy", "dot", "dottie"],
    &["victoria", "vicky", "tori"],
    &["christine", "chris", "chrissy", "tina"],
    &["alexandra", "alex", "sandra", "lexi"],
    &["abigail", "abby"],
    &["samantha", "sam"],
    &["theresa", "terry", "tess"],
    &["jacqueline", "jackie"],
    &["josephine", "jo", "josie"],
    &["kimberly", "kim"],
    &["pamela", "pam"],
    &["cynthia", "cindy"],
    &["judith", "judy"],
    &["eleanor", "ellie", "nora"],
    &["isabella", "isabel", "bella", "izzy"],
];

/// Each name's groups, as bits of a mask (a name may be in several: "jon"). Built once; a
/// scan of every group for every pair scored was a sixth of matching time.
fn groups_of(name: &str) -> u128 {
    static INDEX: std::sync::LazyLock<std::collections::HashMap<&'static str, u128>> =
        std::sync::LazyLock::new(|| {
            let mut index = std::collections::HashMap::new();
            for (i, group) in GROUPS.iter().enumerate() {
                for name in *group {
                    *index.entry(*name).or_insert(0u128) |= 1u128 << i;
                }
            }
            index
        });
    INDEX.get(name).copied().unwrap_or(0)
}

pub fn are_nicknames(a: &str, b: &str) -> bool {
    groups_of(a) & groups_of(b) != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nicknames_in_any_shared_group() {
        assert!(GROUPS.len() <= 128, "one bit per group");
        assert!(are_nicknames("bill", "william"));
        assert!(are_nicknames("william", "liam"));
        // "jon" is both John's and Jonathan's.
        assert!(are_nicknames("jon", "john") && are_nicknames("jon", "jonathan"));
        assert!(!are_nicknames("john", "jonathan"));
        assert!(!are_nicknames("bill", "bob"));
        assert!(
            !are_nicknames("zeke", "zeke"),
            "unknown names are in no group"
        );
        assert!(are_nicknames("sam", "samantha") && are_nicknames("sam", "samuel"));
    }
}
