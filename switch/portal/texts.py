"""zh-CN wording of the portal: response-code reasons (beside the English
``switch.domain.codes.MEANINGS``), transaction names, row states, terminal roles and states.

Data and two lookups only; must not decide anything (which code means approved lives in
``switch.admin.reports``).
"""

from __future__ import annotations

from switch.domain.codes import MEANINGS

REASONS_ZH: dict[str, str] = {
    "00": "交易成功", "03": "商户未登记或已停用", "05": "发卡行拒绝（不予承兑）",
    "12": "交易状态不符", "13": "金额无效", "14": "无效卡号", "15": "无此发卡行路由",
    "25": "找不到原交易", "30": "报文格式错误", "40": "不支持的交易", "41": "挂失卡",
    "43": "被窃卡", "51": "余额不足", "54": "卡已过期", "55": "密码错误",
    "61": "超出商户月交易限额", "64": "金额或卡号与原交易不符", "75": "激活尝试次数过多",
    "77": "请先签到或结算", "91": "发卡行暂不可用", "94": "重复交易", "96": "系统故障",
    "97": "终端未登记或未启用", "98": "发卡行超时", "99": "密码块错误", "A0": "MAC 校验失败",
}

TXN_ZH: dict[str, str] = {
    "consume": "消费", "scan_to_pay": "扫码支付", "consume_void": "消费撤销", "refund": "退货",
    "pre_auth": "预授权", "pre_auth_void": "预授权撤销", "completion": "预授权完成",
    "completion_advice": "预授权完成通知", "completion_void": "预授权完成撤销",
    "balance_inquiry": "余额查询", "transfer": "转账", "reversal": "冲正",
    "test": "测试通知",
}

STATE_ZH: dict[str, str] = {
    "approved": "成功", "declined": "失败", "voided": "已撤销", "reversed": "已冲正",
    "completed": "已完成",
}

TERMINAL_STATE_ZH: dict[str, str] = {
    "active": "正常", "disabled": "已停用", "awaiting_activation": "待激活",
}

ROLE_ZH: dict[str, str] = {"main": "主终端", "secondary": "副终端"}

OUTBOX_STATE_ZH: dict[str, str] = {"pending": "待发送", "delivered": "已送达", "failed": "失败"}


def reason(code: str) -> str:
    """The reason of a response code in words: zh-CN, else the English meaning, else unknown."""
    return REASONS_ZH.get(code) or MEANINGS.get(code) or f"未知应答码 {code}"


def txn_name(txn: str) -> str:
    return TXN_ZH.get(txn, txn)
